from polar_compile.cli import main

raise SystemExit(main())

from automodel.cli import main

raise SystemExit(main())

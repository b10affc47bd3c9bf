from std_assembler.cli import main

raise SystemExit(main())

from std_h5_writer.cli import main

raise SystemExit(main())

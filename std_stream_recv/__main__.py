from std_stream_recv.cli import main

raise SystemExit(main())

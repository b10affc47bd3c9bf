from std_stream_send.cli import main

raise SystemExit(main())

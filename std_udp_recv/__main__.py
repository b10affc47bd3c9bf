from std_udp_recv.cli import main

raise SystemExit(main())

from writer_agent.cli import main

raise SystemExit(main())

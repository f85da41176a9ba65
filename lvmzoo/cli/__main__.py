from lvmzoo.cli import main; raise SystemExit(main())

"""The ``ttt`` command: ``ttt train | eval | generate | bench | ls`` (one module per subcommand)."""

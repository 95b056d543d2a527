"""One module per `radixserve` subcommand; each defines `register(subparsers)`."""

"""The kdrun subcommands' implementations: train's launcher (launch), eval, export, cache-teacher."""

"""The relay's actors: Registry, Dispatcher and Sender shards, each beside its plain logic."""

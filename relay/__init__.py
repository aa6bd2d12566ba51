"""apns-relay: an event-sourced APNs wake-up relay."""

__version__ = "0.1.0"
NAME = "apns-relay"

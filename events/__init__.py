"""The event log: event types, the Journal (the one writer), readers, projections, audit."""

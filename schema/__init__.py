"""Numbered SQL migrations (`NNN_name.sql`), shipped with the package and applied at start-up."""

"""What both sides share: DM messages, units, logging, and (at the top) the CLI and scenarios."""

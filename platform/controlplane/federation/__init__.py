"""Federations, participants, rounds, schedules. Issues 6 and 7."""

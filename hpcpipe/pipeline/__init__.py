"""Schedules as data and what reads them: partition, schedule, simulate, draw, runtime."""

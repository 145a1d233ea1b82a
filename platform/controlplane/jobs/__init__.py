"""The job pattern every long task uses: compare-and-set claim, lease, reaper.

The database row is the truth about a job; a Celery message only rings the bell.
"""

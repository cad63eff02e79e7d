"""Unattended builds: watch the Hub for new models, queue a job per source commit, and run the queue."""

"""Run folders: their layout and files (folder.py), the lock (lock.py), what is checked and prepared before
a run trains in one (setup.py), and their state (status.py; `python -m mipha_lab.runs status`)."""

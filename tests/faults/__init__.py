"""The fault run on real processes (issue #19 items 9-10): ``python -m tests.faults --minutes M --nodes N --seed S``."""

"""Training: the default target (vision.py, then target.py), drafters (drafter.py with drafter_config.py
and drafter_data.py), world streams as material (data.py), the shared schedule and flags."""

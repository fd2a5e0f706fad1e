"""The profiling plane: device profiles (what a device can do and costs), latency and power
measurement, and what the split planner needs from them."""

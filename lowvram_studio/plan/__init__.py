"""The plan stage, between model loading and the engine: which settings a run uses on this card.

``planner`` predicts each phase's process peak and tightens settings to fit a VRAM budget; ``replan``
re-runs the engine with the next tighter settings after a real out-of-memory error. The engine below
knows nothing of budgets: it runs the settings it is given (DESIGN §2's data flow).
"""

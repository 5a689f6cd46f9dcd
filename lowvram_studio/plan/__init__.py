"""The plan stage, between model loading and the engine: which settings a run uses on this card.

``memory_model`` predicts each phase's process peak, per family; ``budgets`` says what a card may use;
``planner`` walks ``moves`` to tighten settings until they fit a VRAM budget, then loosens what turned out
unneeded; ``replan`` re-runs the engine with the next tighter settings after a real out-of-memory error;
``ram`` checks the machine's RAM. The engine below knows nothing of budgets: it runs the settings it is
given (DESIGN §2's data flow).
"""

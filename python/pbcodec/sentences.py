"""Sentences shipped with pbcodec for calibration and evaluation of compressed text
models (all-MiniLM-L6-v2 in the tests and benchmarks). ``CALIBRATION`` feeds
activation statistics; ``TEST`` is a separate set used only to evaluate."""

from __future__ import annotations

TEST = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Stock markets fell sharply today.",
    "How do I bake sourdough bread?",
    "Quantum computers use qubits.",
    "She plays the violin beautifully.",
    "The weather is sunny and warm.",
    "Rust is a systems programming language.",
    "Neural networks can be compressed.",
    "I lost my keys at the train station.",
]

CALIBRATION = [
    "The committee approved the new budget.",
    "Birds migrate south in winter.",
    "He fixed the bicycle chain.",
    "Coffee is grown in tropical regions.",
    "The library opens at nine.",
    "Volcanoes can erupt without warning.",
    "She wrote a letter to her grandmother.",
    "Trains were delayed by snow.",
    "Photosynthesis converts light into energy.",
    "The museum exhibits ancient pottery.",
    "Learn Python programming quickly.",
    "The river flooded the valley.",
]

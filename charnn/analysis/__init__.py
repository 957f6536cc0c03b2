"""Looking at a model: eval (loss, bpc, surprisal, gradient flow), inspect
(states, gates, features), reports and pages."""

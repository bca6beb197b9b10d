"""SAM-family optimizer wrappers around one foreach perturbation kernel (:mod:`.functional`)."""

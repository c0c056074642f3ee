"""The teaching surface: widgets, plots, generated readings of results, the offline handout."""

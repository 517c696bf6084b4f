"""Figures (matplotlib/seaborn) and self-contained HTML reports."""

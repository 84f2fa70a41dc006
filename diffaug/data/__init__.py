"""Real data that ships with diffaug and works offline; see LICENSES.md beside it."""

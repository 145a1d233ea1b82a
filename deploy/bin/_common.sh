# Sourced by the start scripts beside it: one place for what every process needs.
# PYTHON: the interpreter of the image's venv (or the repo's .venv under deploy/local).
PYTHON="${PYTHON:-python}"
export DJANGO_SETTINGS_MODULE="${DJANGO_SETTINGS_MODULE:-controlplane.settings}"
export PYTHONUNBUFFERED=1

# The Tapeline app image: one image for the Prefect worker (which runs every flow),
# the exchange simulator and the one-shot topic creator, so all three run the same code.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code runs from /app (PYTHONPATH); it is not installed into site-packages.
COPY . .
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin tapeline

# Flow runs start in /app (prefect.yaml's set_working_directory), so the code is read
# from here; the user owns nothing in it and cannot change what it runs.
USER tapeline
# Where tasks.core.config keeps local state; /app belongs to root, the app user owns this.
ENV TAPELINE_HOME=/home/tapeline/.tapeline

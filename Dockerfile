# The backend as one image: gunicorn on 9090, models on a volume.
#   docker build -t fewshot-ssd-backend .
#   docker run -p 9090:9090 -v fewshot-models:/data/models fewshot-ssd-backend
# The build stage runs the README's own set-up (scripts/setup.sh): the pinned
# virtual environments and the base SSD, fetched with npm and converted. The
# final image copies the result and needs no Node.js.

FROM python:3.11-slim-bookworm AS build
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends npm \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY requirements.txt requirements-mediapipe.txt ./
COPY scripts/setup.sh scripts/
COPY model/ model/
ENV MODEL_DIR=/app/models PIP_NO_CACHE_DIR=1
RUN bash scripts/setup.sh && rm -rf /app/models/downloads

FROM python:3.11-slim-bookworm
RUN useradd --create-home --uid 1000 app \
 && mkdir -p /data/models \
 && chown app:app /data/models
WORKDIR /app
COPY --from=build /app/.venv /app/.venv
COPY --from=build /app/.venv-mediapipe /app/.venv-mediapipe
COPY --from=build /app/models/base /app/base
COPY model/ model/
COPY backend/ backend/
COPY docker/entrypoint.sh docker/entrypoint.sh
ENV MODEL_DIR=/data/models PORT=9090 PYTHONUNBUFFERED=1 PATH=/app/.venv/bin:$PATH
USER 1000:1000
VOLUME ["/data/models"]
EXPOSE 9090
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]
ENTRYPOINT ["bash", "docker/entrypoint.sh"]
CMD ["python", "-m", "backend"]

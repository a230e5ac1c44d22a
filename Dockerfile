# emailsvc in one image. The command is ./run.sh: web server, consumer and
# watcher (IMAP IDLE push) together on the embedded default (SQLite under
# /app/var, a volume); compose.yaml runs the same image scaled out
# (./run.sh web, ./run.sh consumer, ./run.sh watcher).
FROM python:3.11-slim-bookworm

ARG VERSION=unknown
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    EMAILSVC_VERSION=$VERSION \
    EMAILSVC_SERVER_HOST=0.0.0.0

RUN useradd --system --uid 10001 --user-group --home-dir /app --no-create-home emailsvc
WORKDIR /app

# The venv run.sh would make, made at build time; the stamp tells run.sh it is up to date.
COPY requirements.txt ./
RUN python -m venv .venv \
    && .venv/bin/pip install --no-cache-dir -r requirements.txt \
    && cp requirements.txt .venv/.installed-requirements.txt

COPY . .
RUN mkdir -p var && chown emailsvc:emailsvc var

USER emailsvc
# Database, queue and the generated secret and credential key of the embedded mode.
VOLUME ["/app/var"]
EXPOSE 8080

# docker stop sends this to PID 1 (run.sh, or the one process of ./run.sh web|consumer).
# SIGINT is the consumer's graceful signal (consumer.graceful_signal): running tasks finish,
# for up to consumer.shutdown_timeout (60 s); give docker stop more than that (-t 90,
# or compose's stop_grace_period), or its SIGKILL cuts them short.
STOPSIGNAL SIGINT

# Healthy while a consumer heartbeats (non-zero when none answers); the web server's
# own liveness is /health, and run.sh stops the container when either process ends.
HEALTHCHECK --interval=30s --timeout=15s --start-period=60s --retries=3 CMD ["./run.sh", "tasks", "ping"]

CMD ["./run.sh"]

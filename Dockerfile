# qisd container image.
#
#   docker build -t qisd .
#   docker run -d --name qisd -p 4470:4470/udp -p 127.0.0.1:9470:9470 \
#       -v qisd-state:/var/lib/qisd qisd run --bootstrap PEER:4470
#
# Two stages: the builder installs qisd and its dependencies (all from wheels) into a
# virtual environment at /opt/qisd; the final image holds that venv, an unprivileged
# user and nothing else. The venv is copied to the same path on the same base image, so
# its interpreter links stay valid.

FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
RUN python -m venv /opt/qisd
COPY pyproject.toml README.md LICENSE ./
COPY qisd ./qisd
RUN /opt/qisd/bin/pip install --no-cache-dir . \
    && /opt/qisd/bin/qisd --version


FROM python:3.11-slim-bookworm

# A fixed numeric uid/gid (10001, above any distribution's system range): `USER`
# needs no /etc/passwd lookup, Kubernetes' runAsNonRoot can check it, and operators
# can chown a bind-mounted state directory to a known owner.
RUN groupadd --system --gid 10001 qisd \
    && useradd --system --uid 10001 --gid qisd --no-create-home \
        --home-dir /var/lib/qisd --shell /usr/sbin/nologin qisd \
    && install -d -o 10001 -g 10001 -m 0700 /var/lib/qisd \
    && install -d -o 10001 -g 10001 -m 0750 /run/qisd

COPY --from=builder /opt/qisd /opt/qisd

# Inside the container the daemon listens on all interfaces (publish the ports to
# choose what the host exposes); state lives on the volume, the control socket in
# /run/qisd where `qisd status` (the health check) finds it through $QISD_SOCKET.
ENV PATH=/opt/qisd/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    QISD_STATE_DIR=/var/lib/qisd \
    QISD_SOCKET=/run/qisd/qisd.sock \
    QISD_LISTEN=0.0.0.0:4470 \
    QISD_METRICS=0.0.0.0:9470

USER 10001:10001
WORKDIR /var/lib/qisd
VOLUME ["/var/lib/qisd"]
EXPOSE 4470/udp 9470/tcp

# `qisd status` exits 0 while the daemon answers on its control socket, non-zero
# (2) when it does not.
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["qisd", "status", "--json"]

# The daemon is PID 1 here. It installs its own SIGTERM/SIGINT handlers (PID 1 would
# otherwise ignore them) and shuts down gracefully within daemon.grace_period, well
# inside docker's default 10 s stop timeout. `docker run --init` adds tini in front
# if you prefer an init that also reaps stray children (qisd starts none).
STOPSIGNAL SIGTERM
ENTRYPOINT ["qisd"]
CMD ["run"]

# mmsim in a container: one image for every service of docker-compose.yml (keys, kernel, mm, clients).
# Build: docker build -t mmsim .    Run: see docs/docker.md
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/mmsim
COPY . /opt/mmsim
# the project and its dependencies (pyzmq, msgpack, pydantic, typer, numpy, rich) from wheels
RUN pip install /opt/mmsim \
    && useradd --create-home --uid 1000 mmsim \
    && mkdir -p /run/mmsim \
    && chown mmsim:mmsim /run/mmsim

# the shared run directory (keys, journal); a named volume mounted here starts out owned by mmsim
VOLUME /run/mmsim
USER mmsim
WORKDIR /home/mmsim
CMD ["mmsim", "--help"]

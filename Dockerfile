# One image for every memhp service of docker-compose.yml (hypervisor, guest, watch,
# scenario): the memhp command is the entrypoint and each service gives the subcommand.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The package alone first, so that a change to a scenario file does not reinstall it.
# The source is removed afterwards: only the installed copy runs.
COPY pyproject.toml README.md /src/
COPY extents/ /src/extents/
COPY memhp/ /src/memhp/
COPY hypervisor/ /src/hypervisor/
COPY guest/ /src/guest/
RUN pip install /src && rm -rf /src

WORKDIR /app
COPY scenarios/ scenarios/

# Not root. The hypervisor keeps its state file in /data, a volume this user owns
# (a named volume starts with the ownership of the image's directory).
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/memhp memhp \
    && mkdir /data \
    && chown memhp:memhp /data
USER memhp
VOLUME ["/data"]

# 50051: the hypervisor (DM channel, Control, health); 50061: a guest's introspection.
EXPOSE 50051 50061
ENTRYPOINT ["memhp"]
CMD ["--help"]

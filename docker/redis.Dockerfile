# Redis for docker-compose.yml, built from Debian's redis-server package on the same kind of base
# as the service's image, so that the stack needs no registry image but a Debian one:
#   docker build -f docker/redis.Dockerfile --build-arg BASE_IMAGE=cama-base:bookworm .
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--dir", "/data"]

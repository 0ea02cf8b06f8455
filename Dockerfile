# vmbalance image: `vmbalance-exporter` and `vmbalance` (the recommender) with libvirt support.
#
#   docker build -t vmbalance .
#   docker run --rm vmbalance vmbalance-exporter --help
#   docker run --rm vmbalance vmbalance --help
#
# The wheels (libvirt-python compiles against libvirt-dev) are built in a first stage; the
# image keeps only the libvirt client library.

FROM python:3.11-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY recommender ./recommender
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[libvirt]'

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels 'vmbalance[libvirt]' \
 && rm -rf /wheels
# 9641: vmbalance-exporter, 9643: vmbalance serve.
EXPOSE 9641 9643
CMD ["vmbalance-exporter"]

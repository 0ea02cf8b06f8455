# vmbalance image: `vmbalance-exporter` and `vmbalance` (the recommender) with libvirt support.
#
#   docker build -t vmbalance .
#   docker run --rm vmbalance vmbalance-exporter --help
#   docker run --rm vmbalance vmbalance --help
#
# An exporter-only image (what a hypervisor runs; without the recommender's libraries):
#
#   docker build --build-arg EXTRAS=libvirt -t vmbalance-exporter .
#
# The build stage installs uv (pinned and hash-checked in requirements/uv.txt), exports uv.lock
# for the chosen extras as a requirements file with hashes, and builds every wheel from it
# (libvirt-python compiles against libvirt-dev), so the image gets exactly the locked versions.
# The image keeps only those wheels, installed without resolving, and the libvirt client library.

ARG EXTRAS="libvirt recommender"

FROM python:3.11-slim AS build
ARG EXTRAS
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev pkg-config libvirt-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/uv.txt ./requirements/
RUN pip install --no-cache-dir --require-hashes -r requirements/uv.txt
COPY pyproject.toml uv.lock README.md ./
COPY exporter ./exporter
COPY recommender ./recommender
# PIP_CONSTRAINT reaches the isolated builds too: their setuptools is the one pyproject pins.
RUN uv export --frozen --no-dev --no-emit-project $(for extra in $EXTRAS; do echo --extra "$extra"; done) \
      --output-file requirements.txt \
 && python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['tool']['uv']['build-constraint-dependencies'], sep='\n')" \
      > build-constraints.txt \
 && PIP_CONSTRAINT=build-constraints.txt pip wheel --no-cache-dir --require-hashes --wheel-dir /wheels -r requirements.txt \
 && PIP_CONSTRAINT=build-constraints.txt pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends libvirt0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --no-deps /wheels/*.whl \
 && rm -rf /wheels
# 9641: vmbalance-exporter, 9643: vmbalance serve.
EXPOSE 9641 9643
CMD ["vmbalance-exporter"]

FROM python:3.11-slim-bookworm
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends flite espeak-ng \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/callbridge
COPY pyproject.toml README.md ./
COPY bridge/ bridge/
COPY scripts/ scripts/
RUN pip install --no-cache-dir .
VOLUME /var/lib/callbridge
ENV CALLBRIDGE_DATABASE=/var/lib/callbridge/callbridge.sqlite3
ENTRYPOINT ["callbridge"]
CMD ["run"]

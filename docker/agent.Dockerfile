# The deploy agent: the edge extra only (numpy, onnxruntime, pyzmq, msgpack, pillow; no torch).
FROM python:3.11-slim
WORKDIR /opt/edgesplit
COPY pyproject.toml README.md ./
COPY edgesplit ./edgesplit
RUN pip install --no-cache-dir '.[edge]'
ENTRYPOINT ["edgesplit", "agent"]

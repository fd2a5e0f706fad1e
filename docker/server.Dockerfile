# The server daemon: ONNX Runtime tails on CPU (torch tails: build FROM a CUDA torch image instead
# and install '.[server]' on top of its torch).
FROM python:3.11-slim
WORKDIR /opt/edgesplit
COPY pyproject.toml README.md ./
COPY edgesplit ./edgesplit
RUN pip install --no-cache-dir '.[server]'
EXPOSE 5555 8000
ENTRYPOINT ["edgesplit", "serve"]

"""A local Google Cloud Storage for tests: gcp-storage-emulator behind the three routes samjax uses.

orbax reaches GCS through tensorstore (``TENSORSTORE_GCS_HTTP_URL``) and google-cloud-storage
(``STORAGE_EMULATOR_HOST``); etils.epath and TFDS through TensorFlow's GCS filesystem, which has
no endpoint setting but honours ``HTTPS_PROXY`` and ``CURL_CA_BUNDLE``: a CONNECT proxy sends
``*.googleapis.com:443`` to a TLS twin of the emulator with a self-signed certificate. Nothing
leaves 127.0.0.1. Three emulator quirks are patched (see ``_serve``).

Use :func:`start` (returns an :class:`Emulator` whose ``env`` the test's subprocesses get) and
``Emulator.stop``. Run as ``python gcs_emulator.py serve CERT KEY`` it is the server itself.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import json
import os
import re
import select
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

BUCKET = 'bucket'


def _serve(cert: str, key: str) -> None:
  from gcp_storage_emulator import server as gs, storage as gst  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import buckets, objects  # pylint: disable=g-import-not-at-top
  init, media = gs.Request.__init__, objects._media_upload  # pylint: disable=protected-access

  def init_keeping_https(self, handler, method):
    # The resumable-upload Location handed back must stay https on the TLS port.
    init(self, handler, method)
    if getattr(handler.server, 'tls', False):
      self._base_url = 'https' + self._base_url[4:]
      self._full_url = 'https' + self._full_url[4:]

  def media_upload_allowing_empty(request, *args):
    # TensorFlow's makedirs uploads a 0-byte "dir/" object, on which the emulator crashes.
    if request.data is None:
      request._data = b''  # pylint: disable=protected-access
    return media(request, *args)

  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    # Real GCS names an object's generation in the headers of every media download; tensorstore
    # (orbax's OCDBT manifests) conditions its next write on it, and without the header its
    # write condition is malformed.
    try:
      obj = storage.get_file_obj(request.params['bucket_name'], request.params['object_id'])
      response['x-goog-generation'] = str(obj['generation'])
      response['x-goog-metageneration'] = str(obj.get('metageneration', '1'))
    except Exception:  # pylint: disable=broad-except  # not found: download answers 404
      pass
    return download(request, response, storage, *args, **kwargs)

  gs.Request.__init__ = init_keeping_https
  objects._media_upload = media_upload_allowing_empty  # pylint: disable=protected-access
  objects.download = download_with_generation

  class Handler(gs.RequestHandler):

    def parse_request(self):
      ok = super().parse_request()
      # TF's curl sends Content-Length and a chunked body: the chunked framing must win.
      if ok and 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
        del self.headers['Content-Length']
      if ok and self.headers.get('Expect', '').lower() == '100-continue':  # else 1 s per upload
        self.wfile.write(b'HTTP/1.1 100 Continue\r\n\r\n')
      return ok

  storage = gst.Storage(use_memory_fs=True)
  buckets.create_bucket(BUCKET, storage)
  plain, tls = (http.server.HTTPServer(('127.0.0.1', 0),
                                                functools.partial(Handler, storage))
                for _ in range(2))
  context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
  context.load_cert_chain(cert, key)
  tls.tls, tls.socket = True, context.wrap_socket(tls.socket, server_side=True)

  class Proxy(socketserver.BaseRequestHandler):
    """CONNECT *.googleapis.com:443 -> the TLS twin; nothing else."""

    def handle(self):
      client, head = self.request, b''
      while b'\r\n\r\n' not in head:
        head += client.recv(4096) or b'\r\n\r\n'
      if not re.match(rb'CONNECT [\w.-]+\.googleapis\.com:443 ', head):
        client.sendall(b'HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n')
        return
      with socket.create_connection(tls.server_address) as upstream:
        client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
        while ready := select.select([client, upstream], [], [], 60)[0]:
          for s in ready:
            data = s.recv(65536)
            if not data:
              return
            (upstream if s is client else client).sendall(data)

  proxy = socketserver.ThreadingTCPServer(('127.0.0.1', 0), Proxy)
  proxy.daemon_threads = True
  for server in (plain, tls, proxy):
    threading.Thread(target=server.serve_forever, daemon=True).start()
  print(plain.server_address[1], proxy.server_address[1], flush=True)
  sys.stdin.read()  # serve until stdin closes


@dataclasses.dataclass
class Emulator:
  process: subprocess.Popen
  url: str
  env: dict

  def stop(self) -> None:
    self.process.stdin.close()
    self.process.terminate()
    self.process.wait(10)

  def list(self, prefix: str) -> list[str]:
    """Object names under ``prefix`` in the bucket (straight from the emulator's JSON API)."""
    query = urllib.parse.urlencode({'prefix': prefix})
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{BUCKET}/o?{query}', timeout=30) as r:
      return [item['name'] for item in json.load(r).get('items', [])]

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{self.url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media',
                                timeout=30) as r:
      return r.read()


def start(tmp_dir: str) -> Emulator:
  key, cert = os.path.join(tmp_dir, 'key.pem'), os.path.join(tmp_dir, 'cert.pem')
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-days', '2',
                  '-subj', '/CN=www.googleapis.com', '-keyout', key, '-out', cert,
                  '-addext', 'subjectAltName=DNS:www.googleapis.com,DNS:storage.googleapis.com',
                  '-addext', 'basicConstraints=critical,CA:TRUE'], check=True, capture_output=True)
  process = subprocess.Popen([sys.executable, os.path.abspath(__file__), 'serve', cert, key],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  http_port, proxy_port = process.stdout.readline().split()
  url = f'http://127.0.0.1:{http_port}'
  dead = '127.0.0.1:9'  # metadata-server lookups hit a closed loopback port
  env = dict(TENSORSTORE_GCS_HTTP_URL=url, STORAGE_EMULATOR_HOST=url,
             HTTPS_PROXY=f'http://127.0.0.1:{proxy_port}', NO_PROXY='127.0.0.1,localhost',
             CURL_CA_BUNDLE=cert, GOOGLE_AUTH_TOKEN_FOR_TESTING='fake', NO_GCE_CHECK='true',
             GCE_METADATA_HOST=dead, GCE_METADATA_IP=dead, GCE_METADATA_ROOT=dead)
  return Emulator(process, url, env)


if __name__ == '__main__':
  if sys.argv[1:2] == ['serve']:
    _serve(*sys.argv[2:4])

# A CPython SyncManager server on 127.0.0.1:<free port>; prints the port, serves until
# a client sends 'shutdown'. argv: authkey
import sys
from multiprocessing.managers import SyncManager, BaseManager

m = SyncManager(address=('127.0.0.1', 0), authkey=sys.argv[1].encode())
server = m.get_server()
print('PORT', server.address[1], flush=True)
server.serve_forever()

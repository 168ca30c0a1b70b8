"""The disk generation witness's messages, between a core and its launcher
(sealvm/launcher/witness.py): op 'R' (read) or 'A' (advance) | disk id 16 | generation
u64, answered by the recorded generation u64."""
import struct

REQUEST = struct.Struct("<c16sQ")
ANSWER = struct.Struct("<Q")

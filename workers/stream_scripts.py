"""Lua scripts that make a job's last step atomic on the Redis/Valkey server.

Writing the result, marking the job done and acknowledging the entry happen in one script, so a
crash between them cannot leave a result without an ack or an ack without a result, and two
consumers that both scored a job (one of them after reclaiming it) write one result between them.
"""

from __future__ import annotations

# KEYS: done marker, results stream, jobs stream
# ARGV: entry id, group, done ttl (s), results maxlen, result JSON
COMMIT_RESULT = """
local first = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[3]))
if first then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'result', ARGV[5])
end
redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
if first then return 1 else return 0 end
"""

# KEYS: dead stream, jobs stream
# ARGV: entry id, group, dead maxlen, dead-letter JSON
COMMIT_DEAD = """
redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'dead', ARGV[4])
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
return 1
"""

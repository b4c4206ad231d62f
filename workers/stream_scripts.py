"""Lua scripts that make a job's last step atomic on the Redis/Valkey server.

Writing the result, marking the job done and acknowledging the entry happen in one script, so a
crash between them cannot leave a result without an ack or an ack without a result, and two
consumers that both scored a job (one of them after reclaiming it) write one result between them.

Each entry also gets a "settled" marker when it is answered, result or dead letter: a consumer that
dead-letters an entry (too many deliveries, say) while another is still scoring it cannot give the
entry both a result and a dead letter, whichever script runs first wins. Both scripts release the
job's owner marker (`StreamNames.owner_marker`) when the answering entry holds it.

A job's done and owner markers both hold ``"<stream> <entry id>"`` (`entry_marker`): ids are unique only
within one stream, and two lines' streams can hand out the same id in the same millisecond. `TAKE_JOB`
reads the done marker and takes the owner marker in one step, so an entry never starts scoring a job
whose result another entry has just committed.
"""

from __future__ import annotations

DONE_BY_ANOTHER_ENTRY = 2
"""`COMMIT_RESULT`'s answer when the job's done marker names another entry."""

# KEYS: done marker of the job, owner marker of the job
# ARGV: this entry's marker ("<stream> <entry id>"), owner ttl (s)
# Returns {"done", <done marker>} when the job has a result (nothing taken); {"owner", <owner marker>}
# when an entry holds the job already (this one, on a redelivery, or another: nothing taken); else
# {"taken", <this entry's marker>}: the owner marker is now this entry's.
TAKE_JOB = """
local done = redis.call('GET', KEYS[1])
if done then
  return {'done', done}
end
local owner = redis.call('GET', KEYS[2])
if owner then
  return {'owner', owner}
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', tonumber(ARGV[2]))
return {'taken', ARGV[1]}
"""

# KEYS: done marker, results stream, jobs stream, settled marker of the entry, owner marker of the job
# ARGV: entry id, group, done ttl (s), results maxlen, result JSON, this entry's marker ("<stream> <entry id>")
# Returns 1 if the result was written; 0 if the entry already had an answer (acknowledged again);
# 2 if another entry holds the job's result: nothing written or acknowledged, the caller dead-letters
# this entry as a duplicate. A done marker of an older release holds the bare entry id and still counts.
COMMIT_RESULT = """
local function release_owner()
  if redis.call('GET', KEYS[5]) == ARGV[6] then
    redis.call('DEL', KEYS[5])
  end
end
if redis.call('EXISTS', KEYS[4]) == 1 then
  redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
  release_owner()
  return 0
end
local done = redis.call('GET', KEYS[1])
if done and done ~= ARGV[6] and done ~= ARGV[1] then
  return 2
end
if not done then
  redis.call('SET', KEYS[1], ARGV[6], 'EX', tonumber(ARGV[3]))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', tonumber(ARGV[4]), '*', 'result', ARGV[5])
end
redis.call('SET', KEYS[4], 'result', 'EX', tonumber(ARGV[3]))
redis.call('XACK', KEYS[3], ARGV[2], ARGV[1])
release_owner()
if done then return 0 else return 1 end
"""

# KEYS: dead stream, jobs stream, settled marker of the entry[, owner marker of the job]
# ARGV: entry id, group, dead maxlen, dead-letter JSON, settled ttl (s)[, owner value]
# Returns 1 if the dead letter was written, 0 if the entry already had an answer. The owner marker, when
# given and held by this entry, is released: the job's id is free for a corrected job.
COMMIT_DEAD = """
local first = redis.call('SET', KEYS[3], 'dead', 'NX', 'EX', tonumber(ARGV[5]))
if first then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', tonumber(ARGV[3]), '*', 'dead', ARGV[4])
end
redis.call('XACK', KEYS[2], ARGV[2], ARGV[1])
if #KEYS >= 4 and redis.call('GET', KEYS[4]) == ARGV[6] then
  redis.call('DEL', KEYS[4])
end
if first then return 1 else return 0 end
"""

# KEYS: jobs stream
# ARGV: group, consumer
# Deletes the consumer from the group only while it has no pending entry (checked and deleted in one
# step: XGROUP DELCONSUMER drops whatever the consumer holds). Returns 1 if deleted, 0 if not.
FORGET_IDLE_CONSUMER = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then
  return 0
end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# KEYS: jobs stream, set of lines in use
# ARGV: the stream's cap (entries), line, then the entry's field/value pairs
# Adds the entry (XADD MAXLEN ~ cap) and the line to the set. A stream below its cap keeps every entry,
# answered or not (operators re-drive dead letters from the original entries). At the cap, answered
# entries are trimmed first, at most TRIM_LIMIT at a time and only whole nodes of them (XTRIM MINID ~ …
# LIMIT: nothing is copied), up to the earliest entry some consumer group has not answered (its oldest
# pending entry, or the one after its last delivered). If the stream is still at its cap (or no group
# exists yet), nothing is added and the reply is the error "BACKLOG_FULL <entries>": a publisher is told,
# instead of an unread job being trimmed away.
PUBLISH_JOB = """
local TRIM_LIMIT = 100
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function earliest(a, b)
  if not a then return b end
  if not b then return a end
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  if ams < bms or (ams == bms and aseq <= bseq) then return a end
  return b
end
local stream, cap = KEYS[1], tonumber(ARGV[1])
local held = redis.call('XLEN', stream)
if held >= cap then
  local unanswered = nil
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local info = {}
    for i = 1, #group, 2 do info[group[i]] = group[i + 1] end
    local ms, seq = parse(info['last-delivered-id'])
    local point = string.format('%.0f-%.0f', ms, seq + 1)
    if tonumber(info['pending']) > 0 then
      point = earliest(point, redis.call('XPENDING', stream, info['name'])[2])
    end
    unanswered = earliest(unanswered, point)
  end
  if unanswered then
    redis.call('XTRIM', stream, 'MINID', '~', unanswered, 'LIMIT', TRIM_LIMIT)
    held = redis.call('XLEN', stream)
  end
  if held >= cap then
    return redis.error_reply('BACKLOG_FULL ' .. held)
  end
end
local id = redis.call('XADD', stream, 'MAXLEN', '~', cap, '*', unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
return id
"""

# KEYS: a job's filed marker (`StreamNames.filed_marker`)
# ARGV: this confirmation's marker ("<confirmed_at µs> <entry id>", `workers.confirmations.filed_marker_value`),
#       the marker's ttl (s)
# Moves the marker to this confirmation unless it names a later one already: returns 1 when set, 0 when the
# marker stays (a later confirmation of the job was filed first). Confirmations are ordered by when the
# operator confirmed, then by entry id; a bare entry id (an older release's marker) counts as confirmed at
# its entry's millisecond. The marker only ever moves forward.
ADVANCE_FILED_MARKER = """
local function order(value)
  local us, ms, seq = string.match(value, '^(%d+) (%d+)-(%d+)$')
  if us then
    return tonumber(us), tonumber(ms), tonumber(seq)
  end
  ms, seq = string.match(value, '^(%d+)-?(%d*)$')
  ms = tonumber(ms) or 0
  return ms * 1000, ms, tonumber(seq) or 0
end
local current = redis.call('GET', KEYS[1])
if current then
  local cus, cms, cseq = order(current)
  local us, ms, seq = order(ARGV[1])
  if cus > us or (cus == us and (cms > ms or (cms == ms and cseq > seq))) then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', tonumber(ARGV[2]))
return 1
"""

# KEYS: the dead-letter stream, the dead letter's original stream (a job stream or the confirmations)
# ARGV: the dead letter's entry id, its original entry's id, the stream's cap (entries)
# Returns {"gone"} when the dead letter is no longer there (another re-drive took it), {"trimmed"} when the
# original entry is gone from its stream (nothing to send again; the dead letter stays), {"full"} when the
# stream holds its cap already (as a refused publish: nothing added, the dead letter stays), else
# {"redriven", <new entry id>}: the original's fields added again as a new entry and the dead letter
# deleted, in one step, so a re-drive that is interrupted or run twice sends each job once.
REDRIVE_DEAD_LETTER = """
local letter = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #letter == 0 then
  return {'gone'}
end
local original = redis.call('XRANGE', KEYS[2], ARGV[2], ARGV[2])
if #original == 0 then
  return {'trimmed'}
end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[3]) then
  return {'full'}
end
local new_id = redis.call('XADD', KEYS[2], '*', unpack(original[1][2]))
redis.call('XDEL', KEYS[1], ARGV[1])
return {'redriven', new_id}
"""

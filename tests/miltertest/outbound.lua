-- One agent reply (or a mail that only looks like one) through the real `postroom milter`, sent the way
-- Postfix's smtpd sends a submission, and postroom's end-of-message answer checked.  Run by
-- tests/test_miltertest_outbound.py, after tests/miltertest/inbound.lua has opened the ticket:
--
--   miltertest -vv -D socket=unix:/path/milter.sock -D qid=4ABC123 -D auth_login=meier -D expect=sent ... -s outbound.lua
--
-- Everything scenario-specific arrives as a -D global (miltertest defines each as a Lua string):
--   socket, qid                                  where the milter listens; the Postfix queue id
--   env_from, rcpt, header_from, subject,
--   message_id, body                             the mail (envelope addresses without <>; body with CRLF)
--   in_reply_to, forged_owner, auth_login        optional: threading header, a forged X-Postroom-Owner
--                                                header, the SMTP AUTH login ({auth_authen}, sent with MAIL)
--   expect                                       "sent", "refused", "tempfail" or "untouched"
--   new_from, reply_to, new_subject, team_copy   for expect=sent: the rewritten From, the Reply-To, the
--                                                subject with its token, the recipient of the team's copy
--   reply_code, reply_status, reply_text         for expect=refused and tempfail: the SMTP reply
--                                                (team_copy for every expect: it must not be added then)
--
-- What miltertest cannot check, the Python side checks from miltertest's -vv trace: it has no eom_check for
-- SMFIR_CHGFROM (the envelope sender change), only the wire trace shows it ("cmd e, len N").
--
-- Debian's miltertest exits 1 without printing a Lua error, so the body runs under pcall and the
-- error is printed here.

local S = dofile(lib)
local value, need, ok, brackets, reply_name = S.value, S.need, S.ok, S.brackets, S.reply_name
local send = S.send

local function connect()
	return S.connect("ORIGINATING", "agent-pc.example.test", "192.0.2.80")
end

-- Every failed expectation is collected, so one run reports all of them.
local failures = {}

local function expect(cond, what)
	if not cond then
		table.insert(failures, what)
	end
end

local SHOWN_HEADERS = {
	"DKIM-Signature", "Reply-To", "Message-ID",
	"X-Postroom-Ticket", "X-Postroom-Owner", "X-Postroom-State", "X-Postroom-Status",
}

-- miltertest cannot list the captured edits; show at least the headers postroom added or inserted
-- (mt.getheader finds both).  The Python side reads the DKIM-Signature value from this.
local function added_headers(conn)
	local lines = {}
	for _, name in ipairs(SHOWN_HEADERS) do
		local n = 0
		while true do
			local v = mt.getheader(conn, name, n)
			if v == nil then
				break
			end
			-- A long value comes folded ("\n" and white space, as libmilter takes it): one line here.
			table.insert(lines, string.format("  added %s: %s", name, (v:gsub("\r?\n[ \t]+", " "))))
			n = n + 1
		end
	end
	return table.concat(lines, "\n")
end

-- None of the edits of a sent reply: what a refused, tempfailed or untrusted mail must not get.
local function expect_no_reply_edits(conn)
	expect(not mt.eom_check(conn, MT_HDRCHANGE, "From"), "From changed")
	expect(not mt.eom_check(conn, MT_HDRCHANGE, "Subject"), "Subject changed")
	expect(not mt.eom_check(conn, MT_HDRINSERT), "a header was inserted")
	expect(not mt.eom_check(conn, MT_HDRADD), "a header was added")
	expect(mt.getheader(conn, "DKIM-Signature", 0) == nil, "DKIM-Signature added")
	local copy = brackets(need("team_copy"))
	expect(not mt.eom_check(conn, MT_RCPTADD, copy), "team copy recipient " .. copy .. " added")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
end

local function check_sent(conn)
	expect(mt.getreply(conn) == SMFIR_ACCEPT, "end of message answered " .. reply_name(conn) .. ", not accept")
	local from = need("new_from")
	expect(mt.eom_check(conn, MT_HDRCHANGE, "From", from), "From not changed to " .. from)
	local reply_to = need("reply_to")
	expect(mt.eom_check(conn, MT_HDRADD, "Reply-To", reply_to), "Reply-To " .. reply_to .. " not added")
	local subject = need("new_subject")
	expect(mt.eom_check(conn, MT_HDRCHANGE, "Subject", subject), "Subject not changed to " .. subject)
	-- The signature goes on top (smfi_insheader at index 0, SMFIR_INSHEADER), not below the other headers.
	local sig = mt.getheader(conn, "DKIM-Signature", 0)
	expect(sig ~= nil, "no DKIM-Signature added or inserted")
	if sig ~= nil then
		expect(mt.eom_check(conn, MT_HDRINSERT, "DKIM-Signature", sig, 0), "DKIM-Signature not inserted at index 0")
		expect(not mt.eom_check(conn, MT_HDRADD, "DKIM-Signature"), "DKIM-Signature appended, not inserted")
		expect(mt.getheader(conn, "DKIM-Signature", 1) == nil, "more than one DKIM-Signature")
	end
	local copy = brackets(need("team_copy"))
	expect(mt.eom_check(conn, MT_RCPTADD, copy), "team copy recipient " .. copy .. " not added")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
	-- Only postroom may say who owns a ticket: the internal headers leave the mail, the client's copy too.
	expect(not mt.eom_check(conn, MT_HDRADD, "X-Postroom-Owner"), "X-Postroom-Owner added to an outgoing reply")
	if value("forged_owner") then
		expect(mt.eom_check(conn, MT_HDRDELETE, "X-Postroom-Owner", 1), "forged X-Postroom-Owner #1 not deleted")
	else
		expect(not mt.eom_check(conn, MT_HDRDELETE), "a header was deleted though none was forged")
	end
	if value("new_body") then
		expect(mt.eom_check(conn, MT_BODYCHANGE, value("new_body")), "body not replaced by -D new_body")
	else
		expect(not mt.eom_check(conn, MT_BODYCHANGE), "body replaced")
	end
end

local function check_reply(conn)
	-- libmilter sends smfi_setreply's text as SMFIR_REPLYCODE in place of SMFIR_REJECT / SMFIR_TEMPFAIL.
	expect(mt.getreply(conn) == SMFIR_REPLYCODE, "end of message answered " .. reply_name(conn) .. ", not replycode")
	-- MT_SMTPREPLY builds "code status text" and compares it with the whole reply line by strcmp; the one-
	-- and two-parameter forms the manual offers format the missing parts from NULL and never match postroom's
	-- reply, so the text is always given in full (and exactly: minute of "since" included).
	local code, status, text = need("reply_code"), need("reply_status"), need("reply_text")
	expect(mt.eom_check(conn, MT_SMTPREPLY, code, status, text),
		"SMTP reply is not: " .. code .. " " .. status .. " " .. text)
	expect_no_reply_edits(conn)
end

local function check_untouched(conn)
	expect(mt.getreply(conn) == SMFIR_ACCEPT, "end of message answered " .. reply_name(conn) .. ", not accept")
	expect(not mt.eom_check(conn, MT_HDRCHANGE), "a header was changed or deleted")
	expect_no_reply_edits(conn)
end

local CHECKS = { sent = check_sent, refused = check_reply, tempfail = check_reply, untouched = check_untouched }

local function main()
	mt.set_timeout(30)
	local check = CHECKS[need("expect")]
	if check == nil then
		error("unknown -D expect=" .. need("expect"), 0)
	end
	local headers = {
		{ "From", need("header_from") },
		{ "To", need("rcpt") },
		{ "Subject", need("subject") },
		{ "Message-ID", need("message_id") },
		{ "Date", "Mon, 02 Jun 2025 11:00:00 +0200" },
		{ "MIME-Version", "1.0" },
		{ "Content-Type", "text/plain; charset=utf-8" },
		{ "User-Agent", "Thunderbird 128" },
	}
	if value("in_reply_to") then
		table.insert(headers, { "In-Reply-To", value("in_reply_to") })
		table.insert(headers, { "References", value("in_reply_to") })
	end
	if value("forged_owner") then
		table.insert(headers, { "X-Postroom-Owner", value("forged_owner") })
	end

	local conn = connect()
	send(conn, headers, need("body"))
	check(conn)
	local reply, added = reply_name(conn), added_headers(conn)
	mt.disconnect(conn)
	if #failures > 0 then
		error(table.concat(failures, "\n") .. "\n" .. added, 0)
	end
	mt.echo("ok: " .. need("expect") .. ", " .. reply .. "\n" .. added)
end

local passed, err = pcall(main)
if not passed then
	print("FAILED: " .. tostring(err))
	error(err, 0)
end

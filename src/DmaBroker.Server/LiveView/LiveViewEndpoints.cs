using System.Buffers;
using System.Globalization;
using System.IO.Pipelines;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using DmaBroker.Core;
using DmaBroker.Core.Topology;
using DmaBroker.Server.Hosting;
using Microsoft.AspNetCore.Http.Features;

namespace DmaBroker.Server.LiveView;

/// <summary>
/// The live view (SPEC §13) on the <c>--http-listen</c> listener: <c>GET /</c>, a static page
/// (HTML, script and style, embedded in this assembly), and <c>GET /events</c>, the Watch
/// journal as server-sent events the page draws from. Both need the viewer role, as every
/// endpoint of that listener does.
/// </summary>
/// <remarks>
/// <para><c>/events</c> sends a <c>snapshot</c> event (the whole table, the latest changes before
/// it, and this broker's boot id), then each change as a <c>group</c>, <c>device</c>,
/// <c>device_removed</c>, <c>group_removed</c> or <c>session_ended</c> event; every one of them
/// carries its revision as the SSE <c>id</c>. A request with <c>Last-Event-ID: &lt;revision&gt;</c>
/// (which browsers send when they reconnect) resumes: a <c>resumed</c> event without id (the boot
/// id, so that a page can tell a restarted broker, whose revisions count again from 1), then the
/// changes after that revision, when the journal still keeps them all; otherwise, and for a
/// Last-Event-ID that is no revision at all, it starts with a fresh snapshot, as a Watch that fell
/// behind does: a browser's EventSource gives up for good on an error status, a snapshot always
/// heals it. A slow reader is resynchronised with a snapshot, as on Watch.</para>
/// <para>A comment (<c>: keepalive</c>) every <see cref="HeartbeatInterval"/> on the broker's
/// clock keeps idle proxies from cutting the stream. The stream ends quietly when the client
/// leaves or the broker stops.</para>
/// </remarks>
public sealed class LiveViewEndpoints(Broker broker, IHostApplicationLifetime lifetime, TimeProvider time)
{
    /// <summary>How often an idle stream gets a keepalive comment.</summary>
    public static readonly TimeSpan HeartbeatInterval = TimeSpan.FromSeconds(15);

    /// <summary>How long a browser waits before it reconnects a dropped stream (the SSE <c>retry</c> field), in ms.</summary>
    public const int ReconnectMs = 1000;

    /// <summary>How many of the latest changes a snapshot carries for the page's event list.</summary>
    public const int RecentChanges = 50;

    // Only what this page needs: its own script, style and event stream; no framing, no referrer.
    private const string ContentSecurityPolicy =
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

    private static readonly byte[] Keepalive = ": keepalive\n\n"u8.ToArray();

    /// <summary>Tells this broker's revisions from a previous run's, which count from 1 again.</summary>
    public string Boot { get; } = Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8));

    /// <summary>Maps <c>/</c>, its script and style, and <c>/events</c>, all on the web listener only.</summary>
    public static void Map(IEndpointRouteBuilder app)
    {
        MapAsset(app, "/", "index.html", "text/html; charset=utf-8");
        MapAsset(app, "/live.js", "live.js", "text/javascript; charset=utf-8");
        MapAsset(app, "/live.css", "live.css", "text/css; charset=utf-8");
        app.MapGet("/events", (HttpContext http, LiveViewEndpoints view) => view.StreamAsync(http)).OnWebListener();
    }

    private static void MapAsset(IEndpointRouteBuilder app, string path, string resource, string contentType)
    {
        var name = $"{typeof(LiveViewEndpoints).Namespace}.{resource}";
        using var stream = typeof(LiveViewEndpoints).Assembly.GetManifestResourceStream(name)
            ?? throw new InvalidOperationException($"the live view's {resource} is not embedded as {name}");
        var bytes = new byte[stream.Length];
        stream.ReadExactly(bytes);
        app.MapGet(path, (HttpContext http) =>
        {
            var headers = http.Response.Headers;
            headers.ContentSecurityPolicy = ContentSecurityPolicy;
            headers.XContentTypeOptions = "nosniff";
            headers["Referrer-Policy"] = "no-referrer";
            headers.CacheControl = "no-cache";
            return Results.Bytes(bytes, contentType);
        }).OnWebListener();
    }

    /// <summary>Streams the journal as server-sent events until the client leaves or the broker stops.</summary>
    public async Task StreamAsync(HttpContext http)
    {
        var resumeAfter = ParseLastEventId(http.Request.Headers["Last-Event-ID"]);
        http.Response.ContentType = "text/event-stream; charset=utf-8";
        http.Response.Headers.CacheControl = "no-cache";
        http.Response.Headers["X-Accel-Buffering"] = "no";
        http.Features.Get<IHttpResponseBodyFeature>()?.DisableBuffering();

        using var watcher = broker.Journal.Watch(resumeAfter);
        using var stop = CancellationTokenSource.CreateLinkedTokenSource(http.RequestAborted, lifetime.ApplicationStopping);
        // Made before the first write, so that a test that has read the first event may move the clock.
        using var heartbeat = new PeriodicTimer(HeartbeatInterval, time);
        var output = http.Response.BodyWriter;
        var events = watcher.ReadAllAsync(stop.Token).GetAsyncEnumerator(stop.Token);
        Task<bool>? next = null;
        try
        {
            WriteField(output, "retry", ReconnectMs.ToString(CultureInfo.InvariantCulture));
            output.Write("\n"u8);
            if (watcher.Resumed)
            {
                WriteEvent(output, "resumed", id: null, json =>
                {
                    json.WriteStartObject();
                    json.WriteString("boot", Boot);
                    json.WriteNumber("after", resumeAfter!.Value);
                    json.WriteEndObject();
                });
            }
            await output.FlushAsync(stop.Token);

            // This loop is the response's only writer: changes and heartbeats take turns through it.
            next = events.MoveNextAsync().AsTask();
            var tick = heartbeat.WaitForNextTickAsync(stop.Token).AsTask();
            while (true)
            {
                if (await Task.WhenAny(next, tick) == tick)
                {
                    if (!await tick)
                        break;
                    output.Write(Keepalive);
                    tick = heartbeat.WaitForNextTickAsync(stop.Token).AsTask();
                }
                else
                {
                    if (!await next)
                        break;
                    Write(output, events.Current);
                    next = events.MoveNextAsync().AsTask();
                }
                await output.FlushAsync(stop.Token);
            }
        }
        catch (Exception e) when (stop.IsCancellationRequested && e is OperationCanceledException or IOException)
        {
            // The client left or the broker is stopping: the stream just ends.
        }
        finally
        {
            await stop.CancelAsync();
            // The enumerator may be disposed only once its pending read has ended.
            if (next is not null)
                await next.ContinueWith(static _ => { }, CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);
            await events.DisposeAsync();
        }
    }

    /// <summary>A Last-Event-ID that is a revision; anything else (absent, empty, garbage) means none.</summary>
    internal static ulong? ParseLastEventId(string? text) =>
        ulong.TryParse(text?.Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out var revision) ? revision : null;

    private void Write(PipeWriter output, TopologyEvent ev)
    {
        if (ev.Snapshot is { } snapshot)
        {
            var recent = broker.Journal.Recent(RecentChanges).Where(e => e.Revision <= snapshot.Revision);
            WriteEvent(output, "snapshot", snapshot.Revision, json => LiveViewJson.WriteSnapshot(json, Boot, snapshot, recent, broker.Sessions));
        }
        else
        {
            var change = ev.Change!;
            WriteEvent(output, LiveViewJson.EventName(change), ev.Revision, json => LiveViewJson.WriteChange(json, change, broker.Sessions));
        }
    }

    // One event: its name, its id when it has one, and its JSON on one data line (JSON escapes line breaks).
    private static void WriteEvent(PipeWriter output, string name, ulong? id, Action<Utf8JsonWriter> data)
    {
        if (id is { } revision)
            WriteField(output, "id", revision.ToString(CultureInfo.InvariantCulture));
        WriteField(output, "event", name);
        output.Write("data: "u8);
        using (var json = new Utf8JsonWriter(output))
            data(json);
        output.Write("\n\n"u8);
    }

    private static void WriteField(PipeWriter output, string field, string value)
    {
        var length = Encoding.UTF8.GetByteCount(field) + 2 + Encoding.UTF8.GetByteCount(value) + 1;
        var span = output.GetSpan(length);
        var at = Encoding.UTF8.GetBytes(field, span);
        span[at++] = (byte)':';
        span[at++] = (byte)' ';
        at += Encoding.UTF8.GetBytes(value, span[at..]);
        span[at++] = (byte)'\n';
        output.Advance(at);
    }
}

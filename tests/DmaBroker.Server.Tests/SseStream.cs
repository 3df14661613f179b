using System.Net;
using System.Net.Http.Headers;
using System.Text.Json;

namespace DmaBroker.Server.Tests;

/// <summary>One server-sent event: its id (null when it carries none), its name and its data.</summary>
public sealed record SseEvent(string? Id, string Name, string Data)
{
    /// <summary>The data as JSON.</summary>
    public JsonElement Json => JsonDocument.Parse(Data).RootElement.Clone();

    /// <summary>The id as a revision.</summary>
    public ulong Revision => ulong.Parse(Id ?? throw new Xunit.Sdk.XunitException($"event {Name} has no id"), System.Globalization.CultureInfo.InvariantCulture);
}

/// <summary>A GET of a server-sent event stream, read line by line or event by event, each read bounded.</summary>
public sealed class SseStream : IAsyncDisposable
{
    private readonly HttpClient _http;
    private readonly HttpResponseMessage _response;
    private readonly StreamReader? _reader;

    private SseStream(HttpClient http, HttpResponseMessage response, StreamReader? reader)
    {
        _http = http;
        _response = response;
        _reader = reader;
    }

    public HttpStatusCode Status => _response.StatusCode;
    public HttpResponseHeaders Headers => _response.Headers;
    public string? ContentType => _response.Content.Headers.ContentType?.ToString();

    /// <summary>Opens <c>GET {web}/events</c>, optionally resuming after <paramref name="lastEventId"/>, with <paramref name="authorization"/> if given.</summary>
    public static async Task<SseStream> OpenAsync(string webAddress, string? lastEventId = null, AuthenticationHeaderValue? authorization = null)
    {
        var http = new HttpClient { Timeout = Timeout.InfiniteTimeSpan };
        try
        {
            using var request = new HttpRequestMessage(HttpMethod.Get, $"{webAddress}/events");
            request.Headers.Accept.ParseAdd("text/event-stream");
            if (lastEventId is not null)
                request.Headers.TryAddWithoutValidation("Last-Event-ID", lastEventId);
            request.Headers.Authorization = authorization;
            var response = await http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead).WaitAsync(TestBroker.Timeout);
            var reader = response.IsSuccessStatusCode ? new StreamReader(await response.Content.ReadAsStreamAsync()) : null;
            return new SseStream(http, response, reader);
        }
        catch
        {
            http.Dispose();
            throw;
        }
    }

    /// <summary>The next line; null at the end of the stream.</summary>
    public async Task<string?> ReadLineAsync()
    {
        var reader = _reader ?? throw new Xunit.Sdk.XunitException($"the stream was refused: {(int)Status}");
        using var cts = new CancellationTokenSource(TestBroker.Timeout);
        return await reader.ReadLineAsync(cts.Token);
    }

    /// <summary>The next event with data, skipping comments and blocks without data (such as <c>retry:</c>).</summary>
    public async Task<SseEvent> NextAsync()
    {
        string? id = null, name = null, data = null;
        while (true)
        {
            var line = await ReadLineAsync() ?? throw new Xunit.Sdk.XunitException("the event stream ended");
            if (line.Length == 0)
            {
                if (data is not null)
                    return new SseEvent(id, name ?? "message", data);
                id = name = null;
                continue;
            }
            if (line.StartsWith(':'))
                continue;
            var colon = line.IndexOf(':', StringComparison.Ordinal);
            var field = colon < 0 ? line : line[..colon];
            var value = colon < 0 ? "" : line[(colon + 1)..].TrimStart(' ');
            switch (field)
            {
                case "id": id = value; break;
                case "event": name = value; break;
                case "data": data = data is null ? value : data + "\n" + value; break;
            }
        }
    }

    /// <summary>The whole body of a refused request.</summary>
    public Task<string> ReadRefusalAsync() => _response.Content.ReadAsStringAsync().WaitAsync(TestBroker.Timeout);

    public ValueTask DisposeAsync()
    {
        _reader?.Dispose();
        _response.Dispose();
        _http.Dispose();
        return ValueTask.CompletedTask;
    }
}
